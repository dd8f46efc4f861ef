/*
 * Lines of the lobby: chats, "X joined room." / "X left room." and local
 * notices. A line from the server's log has its `position`; the collection
 * holds one line per position, so a chat delivered twice (history and live,
 * or a replay after reconnecting) is shown once.
 *
 * The seed's userJoined / userLeft carry only a name, so live join and leave
 * lines may have no position. Such a line remembers `after`, the highest
 * position the client had seen when it arrived; see HomeModel for how these
 * are matched against history.
 */
(function (ChatApp, Backbone) {
  'use strict';

  var ChatModel = Backbone.Model.extend({
    idAttribute: 'position',
    defaults: function () {
      return {
        kind: 'chat', // chat | join | leave | notice
        sender: '',
        message: '',
        attachments: [], // a chat's files: see models/files.js
        name: '',
        time: null,
        position: undefined,
        after: 0
      };
    },

    // What the line template needs.
    view: function () {
      var attrs = _.clone(this.attributes);
      return _.extend(attrs, ChatApp.formatTime(attrs.time));
    }
  });

  var ChatCollection = Backbone.Collection.extend({
    model: ChatModel,

    // The oldest line that has a position, or undefined.
    firstPosition: function () {
      var first = this.find(function (m) { return m.has('position'); });
      return first ? first.get('position') : undefined;
    }
  });

  ChatApp.models.ChatModel = ChatModel;
  ChatApp.models.ChatCollection = ChatCollection;
})(ChatApp, Backbone);
