/* Online users: one model per name; the collection keeps join order and
 * ignores a name it already holds. */
(function (ChatApp, Backbone) {
  'use strict';

  var UserModel = Backbone.Model.extend({
    idAttribute: 'name',
    defaults: { name: '' }
  });

  var UserCollection = Backbone.Collection.extend({
    model: UserModel,

    // Replace the whole list (the server's `onlineUsers` answer).
    resetNames: function (names) {
      this.reset(_.map(_.uniq(names), function (name) { return { name: name }; }));
    },

    addName: function (name) {
      this.add({ name: name });
    },

    removeName: function (name) {
      this.remove(name);
    }
  });

  ChatApp.models.UserModel = UserModel;
  ChatApp.models.UserCollection = UserCollection;
})(ChatApp, Backbone);
